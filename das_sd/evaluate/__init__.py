"""Evaluation of attribution methods: ground truth, LDS, counterfactuals (docs/method.md §14-§16)."""
