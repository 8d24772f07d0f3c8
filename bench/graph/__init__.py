"""Graph benchmarks: FastRP quality and speed, NCN / NCNC link prediction. Run ``python -m bench.graph.<name>``."""
