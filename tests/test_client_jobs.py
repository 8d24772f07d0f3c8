"""Job-starting client methods over a real loopback server: a progress bar from Jobs.Watch, and no job
left running when the wait is given up (timeout, Ctrl-C, a cancelled asyncio task) unless detached."""

from __future__ import annotations

import _thread
import asyncio
import threading
import time

import numpy as np
import pytest

from retrieval import AsyncClient
from retrieval.client import JobTimeout

FINAL = ("succeeded", "failed", "cancelled")
# a link model with "epochs" far beyond the test: it runs until cancelled (an epoch takes < 1 s here)
ENDLESS = {"input": "learnable", "epochs": 100_000, "hidden": 16}


@pytest.fixture(scope="module")
def graph(client):
    rng = np.random.default_rng(0)
    client.create_graph("g", num_nodes=60)
    client.append_edges("g", rng.integers(0, 60, 300), rng.integers(0, 60, 300))
    return "g"


def _ended(client, job_id: str, within: float = 20.0) -> dict:
    t_end = time.monotonic() + within
    while True:
        rec = client.get_job(job_id)
        if rec["state"] in FINAL or time.monotonic() > t_end:
            return rec
        time.sleep(0.05)


def _running_jobs(client) -> list[dict]:
    return [j for j in client.list_jobs() if j["state"] not in FINAL]


def _none_left_running(client) -> None:
    """Every job the client gave up on was cancelled on the server: each that has not ended yet (a cancel
    lands at the job's next check, which on a loaded machine can be a moment later) ends as cancelled."""
    for j in _running_jobs(client):
        assert _ended(client, j["id"])["state"] == "cancelled", j
    assert _running_jobs(client) == []


def test_fastrp_progress_bar_on_stderr(client, graph, capsys):
    job = client.run_fastrp(graph, dim=16, progress=True)
    assert job["state"] == "succeeded", job
    err = capsys.readouterr().err
    assert f"fastrp {job['id']}" in err and ("it/s" in err or "s/it" in err), err
    assert "60/60" in err and "60.0/60" not in err, err  # whole counts, not floats


def test_no_bar_when_stderr_is_not_a_terminal(client, graph, capsys):
    assert client.run_fastrp(graph, dim=8, embedding="quiet")["state"] == "succeeded"  # progress=None
    assert capsys.readouterr().err == ""


def test_detach_returns_at_once_with_the_job_running(client, graph):
    t0 = time.perf_counter()
    job = client.train_link_model(graph, config=ENDLESS, detach=True)
    assert time.perf_counter() - t0 < 2.0
    assert job["state"] in ("queued", "running"), job
    assert client.get_job(job["id"])["state"] in ("queued", "running")
    client.cancel_job(job["id"])
    assert _ended(client, job["id"])["state"] == "cancelled"


def test_timeout_cancels_the_job_on_the_server(client, graph):
    t0 = time.perf_counter()
    with pytest.raises(JobTimeout, match="timeout=1.5 s") as e:
        client.train_link_model(graph, config=ENDLESS, timeout=1.5)
    assert time.perf_counter() - t0 < 5.0
    assert isinstance(e.value, TimeoutError) and e.value.job_id
    assert _ended(client, e.value.job_id)["state"] == "cancelled"
    _none_left_running(client)


def test_ctrl_c_cancels_the_job_on_the_server(client, graph):
    before = {j["id"] for j in client.list_jobs()}
    timer = threading.Timer(1.0, _thread.interrupt_main)  # KeyboardInterrupt in this (the main) thread
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            client.run_job("link_model_train", graph=graph, model="ncn", config=ENDLESS)
    finally:
        timer.cancel()
    [job] = [j for j in client.list_jobs() if j["id"] not in before]
    assert job["kind"] == "link_model_train"
    assert _ended(client, job["id"])["state"] == "cancelled"
    _none_left_running(client)


def test_async_cancelled_task_and_timeout_cancel_the_job(client, server, graph):
    async def main():
        async with AsyncClient(server.address) as ac:
            with pytest.raises(asyncio.TimeoutError):  # wait_for cancels the awaiting task
                await asyncio.wait_for(ac.train_link_model(graph, config=ENDLESS), 1.5)
            with pytest.raises(JobTimeout) as e:
                await ac.train_link_model(graph, config=ENDLESS, timeout=1.0)
            detached = await ac.train_link_model(graph, config=ENDLESS, detach=True)
            return e.value.job_id, detached

    timed_out, detached = asyncio.run(main())
    assert _ended(client, timed_out)["state"] == "cancelled"
    assert client.get_job(detached["id"])["state"] in ("queued", "running")
    client.cancel_job(detached["id"])
    assert _ended(client, detached["id"])["state"] == "cancelled"
    _none_left_running(client)
    done = asyncio.run(_fastrp_async(server.address, graph))
    assert done["state"] == "succeeded"


async def _fastrp_async(address, graph):
    async with AsyncClient(address) as ac:
        return await ac.run_fastrp(graph, dim=8, embedding="async", progress=False)
