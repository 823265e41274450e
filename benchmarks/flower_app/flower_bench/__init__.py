"""Benchmark Flower App: Flower FedAvg, Flower SecAgg+ and secagg on the same client arrays."""
