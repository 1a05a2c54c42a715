"""Scoring tasks: LM perplexity and last-word, continuation NLL, few-shot harnesses."""
