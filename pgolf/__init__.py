"""The operations layer of the repository: what runs around training but does not compute a score, kept out of
the shipped train_gpt.py (whose bytes count toward the artifact). train_gpt.py uses it when this package sits
beside it and runs without it when copied into a records folder.

- `pgolf.knobs`: other scripts' names for train_gpt.py's knobs: aliases and legacy names rewritten, fixed knobs
  and unimplemented features refused at another value, retired knobs warned about.
- `pgolf.locks`: the one lock helper (an flock on a lock file holding its owner's pid and host).
- `pgolf.runs`: claiming a run's outputs: LOG_DIR checked, the RUN_ID locked, OVERWRITE staged, a failed run's
  log set aside.
- `pgolf.recover`: runs that train nothing here: EVAL_ONLY (re-scoring an artifact) and REQUANTIZE (finishing a
  run whose artifact could not be written, from the weights it kept when that output failed).
- `pgolf.provenance`: the dataset manifest beside the shards: the tokenizer it records, each shard's size and
  sha256 (hashed once, then checked by size and modification time).
- `pgolf.shards`: writing the challenge shard format (the data tools and the tests; train_gpt.py only reads it).
- `pgolf.sample`: SAMPLE_DATA=1's embedded sample dataset, built on first use by data/make_sample.py.

Nothing here imports train_gpt: when train_gpt.py runs as a script it is `__main__`, and a second import would
make a second copy of its classes.
"""
