"""The shipped drafting data (``bench/datasets/drafting``): Spec-Bench dev half and the AlpacaEval corpus.

Prompts are rebuilt from the FastChat ``vicuna_v1.1`` template given in the data's SOURCE.md; answers are
re-encoded with the LLaMA SentencePiece tokenizer and EOS (id 2) is appended, which reproduces the
recorded ``new_tokens`` exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "datasets" / "drafting"
TOKENIZER_MODEL = DATA / "tokenizer" / "tokenizer.model"
TOKENIZER_JSON = DATA / "tokenizer" / "tokenizer.json"
CORPUS_DIR = DATA / "corpus"
QUESTIONS = DATA / "spec_bench" / "question.jsonl"
ANSWERS = DATA / "spec_bench" / "model_answer" / "vicuna-7b-v1.3-vanilla-float16-temp-0.0.jsonl"

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
BOS, EOS = 1, 2
VOCAB_SIZE = 32000
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


@dataclass
class Turn:
    """One generation to replay: the prompt ids (BOS first) and the generated ids (EOS last)."""

    question_id: int
    turn: int
    category: str  # Spec-Bench's six: mt_bench subcategories are folded into "mt_bench"
    subcategory: str
    prompt: np.ndarray  # (P,) int32
    output: np.ndarray  # (G,) int32, EOS included
    new_tokens: int  # as recorded by Spec-Bench


def sp_processor():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(TOKENIZER_MODEL))


def load_turns(limit: int | None = None) -> list[Turn]:
    """All 280 dev turns in file order (question by question, turn 1 before turn 2)."""
    sp = sp_processor()
    questions = {}
    for line in QUESTIONS.read_text().splitlines():
        q = json.loads(line)
        questions[q["question_id"]] = q
    turns: list[Turn] = []
    for line in ANSWERS.read_text().splitlines():
        a = json.loads(line)
        q = questions[a["question_id"]]
        ch = a["choices"][0]
        sub = a["category"]
        cat = "mt_bench" if sub in MT_BENCH else sub
        # "</s>" between turns is the special id 2, not its spelling (as the HF tokenizer treats it)
        done: list[int] = [BOS]
        history = SYSTEM
        for ti, (qtext, atext) in enumerate(zip(q["turns"], ch["turns"])):
            prompt_text = f"{history} USER: {qtext} ASSISTANT:" if history else f"USER: {qtext} ASSISTANT:"
            prompt = np.array(done + sp.encode(prompt_text), dtype=np.int32)
            out = np.array(sp.encode(atext) + [EOS], dtype=np.int32)
            turns.append(Turn(a["question_id"], ti + 1, cat, sub, prompt, out, int(ch["new_tokens"][ti])))
            done = done + sp.encode(f"{prompt_text} {atext}") + [EOS]
            history = ""
        if limit is not None and len(turns) >= limit:
            break
    return turns


def corpus_texts() -> list[str]:
    """AlpacaEval instruction + output texts, one document per record, 4 x 801 records."""
    docs = []
    for f in sorted(CORPUS_DIR.glob("*.json")):
        for r in json.loads(f.read_text()):
            docs.append(f"{r['instruction']}\n{r['output']}")
    return docs
