"""Evaluation: translation quality (sacreBLEU BLEU / chrF, COMET) and retention proxies.

    metrics.py    BLEU with a per-language tokenizer, chrF, COMET, cutting at the separator
    translate.py  batched, length-sorted, rank-sharded translation of test sets
    retention.py  the original model's cached greedy answers; KL / NLL / changed / chrF proxies
    plot.py       translation quality against retention, one point per model (PNG)
    command.py    `radis evaluate`
"""
