"""Self-generated training data: the decoder, the strategies, the crash-safe store, `radis generate`.

    decode.py      batched KV-cache decoding (greedy / sampled) and beam search: the one
                   decoder of the project (generation, evaluation, retention answers)
    strategies.py  continue / ask (RaDis rationales), seqkd, sdft (the baselines' targets)
    store.py       part files, manifest, resume after a kill, N-rank merge
    command.py     `radis generate` (alias `radis rationales`)

The record format both sides use is radis.data.records (below this package), so the
data path reads what generation writes without importing from here.
"""
