"""NCN and NCNC on Cora and CiteSeer: test Hits@100, random 70/10/20 edge splits, several seeds.

Hyper-parameters are the NCN authors' README commands (``retrieval.graph.ncn.PRESETS``); the paper
reports (10 seeds) NCN 89.05 / 91.56 and NCNC 89.65 / 93.47 on Cora / CiteSeer. CN, Adamic-Adar and a
plain GCN (2 GCN layers + Hadamard MLP) run on the same splits.

    python -m bench.graph.ncn_planetoid [--seeds 0 1 2 3 4] [--epochs 100] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import sys

from bench.graph.lp_suite import add_common_args, parse_overrides, run_suite


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, ["cora", "citeseer"], [0, 1, 2, 3, 4], None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    name = args.name or ("ncn_planetoid" if args.device == "cpu" else f"ncn_planetoid_{args.device}")
    cmd = "python -m bench.graph.ncn_planetoid " + " ".join(argv if argv is not None else sys.argv[1:])
    return run_suite(name=name, datasets=args.datasets, models=args.models, seeds=args.seeds, epochs=args.epochs,
                     gcn_epochs=args.gcn_epochs, device=args.device, overrides=parse_overrides(args.set),
                     out_dir=args.out, title="NCN / NCNC on Cora and CiteSeer (Hits@100)", command=cmd,
                     fresh=args.fresh)


if __name__ == "__main__":
    main()
