"""Evaluation: translation quality (sacreBLEU BLEU / chrF, COMET) and general ability.

    metrics.py    BLEU with a per-language tokenizer, chrF, COMET, cutting at the separator
    translate.py  batched, length-sorted, rank-sharded translation of test sets
    retention.py  the original model's cached greedy answers; KL / NLL / changed / chrF proxies
    safety.py     refusal rate on harmful requests (a documented phrase rule)
    general.py    benchmark suites through EleutherAI's lm-evaluation-harness
    subsets.py    category-balanced subsets of prompt sets
    report.py     summary rows and the printed tables
    plot.py       translation quality against each measure of general ability (PNG)
    command.py    `radis evaluate`: which output is scored cut, per-part caching, orchestration
"""
