"""NCN and NCNC on the shipped featureless link-prediction graphs, beside CN, Adamic-Adar and GCN.

Facebook, USAir, NS, PB, Yeast, C.elegans, Power, Router, E.coli, PPI: random 70/10/20 edge splits,
test Hits@100 (and AUC). The graphs have no node features: NCN / NCNC / GCN use learnable node
embeddings (``input='learnable'``) with the Cora hyper-parameters otherwise.

    python -m bench.graph.ncn_lp_graphs [--seeds 0 1 2] [--epochs 40] [--device cuda]
"""

from __future__ import annotations

import argparse
import logging
import sys

from bench.graph.lp_suite import add_common_args, parse_overrides, run_suite

GRAPHS = ["usair", "ns", "celegans", "yeast", "power", "router", "ecoli", "pb", "ppi", "facebook"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, GRAPHS, [0, 1, 2], 40)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    name = args.name or ("ncn_lp_graphs" if args.device == "cpu" else f"ncn_lp_graphs_{args.device}")
    cmd = "python -m bench.graph.ncn_lp_graphs " + " ".join(argv if argv is not None else sys.argv[1:])
    return run_suite(name=name, datasets=args.datasets, models=args.models, seeds=args.seeds, epochs=args.epochs,
                     gcn_epochs=args.gcn_epochs or args.epochs, device=args.device,
                     overrides=parse_overrides(args.set), out_dir=args.out,
                     title="Link prediction on the shipped featureless graphs (Hits@100)", command=cmd,
                     fresh=args.fresh)


if __name__ == "__main__":
    main()
