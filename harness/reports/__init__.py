"""The reports, from the store to the files in `leaderboards/`.

`aggregate` computes every number of a benchmark into a `Leaderboard` (pandas frames from the stored per-example
vectors); `leaderboard`, `sanity` and `label_leak` render one board each, `figures` their figures, `ranking` the
ranking with its intervals and tests, all through `markdown` (the one table writer, which also collects each
table's raw values for the board's JSON); `boards.write` writes them all; `drift` compares a board's stored
numbers with a regeneration's; `attack_cost` renders the attack-cost page from pytest-benchmark's JSON.
"""
