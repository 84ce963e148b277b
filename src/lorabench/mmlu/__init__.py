"""MMLU k-shot, exact and fast: ``data`` (questions, lm-evaluation-harness's prompt, tokenised requests; no torch,
so tokenising worker processes import only it), ``scoring`` (the four letters' log-likelihoods, batched, with
cached prefixes) and ``evaluate`` (MmluOptions, the whole evaluation, its outputs)."""
