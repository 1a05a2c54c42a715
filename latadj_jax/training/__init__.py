"""Fine-tuning: the data-parallel loop, anytime training, the LM objective, ACC profiling."""
