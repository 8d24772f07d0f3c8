"""Cross-encoder k-NN benchmarks: recall vs calls on the shipped fixture, and a live end-to-end run."""
