"""Evaluation of attribution methods: ground truth, LDS, counterfactuals (METHOD.md section 9)."""
