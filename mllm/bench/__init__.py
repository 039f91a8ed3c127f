"""`mllm bench`: the performance suite. Every figure is a ratio to a baseline measured alternately with it.

    mllm bench --quick                 # about 10 minutes on 2 cores; writes bench/results.json and results.md
    python -m mllm.bench --only training generation

One module per section (machine, training, packing, cache, generation,
tokenizers, memory, scale); `timing` holds the alternating min/median
measurement, `profile` the reason behind a missed target, `report` results.json
and the Markdown table, `models`, `corpus` and `standin` what the sections run
on, `options` and `suite` the command. See docs/performance.md.
"""
