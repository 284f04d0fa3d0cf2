"""Teacher top-k extraction: run the teacher once over the corpus, keep what trains.

Modules: `config` (ExtractionConfig), `plan` (batch plan and padded batches), `head` (the LM
head on trained rows), `compat` (teacher/corpus check), `encode` (encoding pool), `run` (the
extraction), `report` (run statistics), `cli` (`python -m kd_pipeline.core.extraction`).

For every trained position `p` of a sample (`loss_mask[p + 1] == 1`, see
docs/architecture.md) the artifact gets the teacher's top-k next-token ids, their log-probs
normalized over the full vocabulary (`logit - logsumexp(logits)`) and the teacher log-prob of
the actual next token `input_ids[p + 1]`.

How it stays close to the cost of a bare forward:

- samples run in length-sorted batches (little padding), right-padded, with a plain causal
  forward of the decoder (right padding never changes a real position's output under a causal
  mask, so no attention mask is needed);
- the LM head is applied only to the hidden rows of trained positions (prompt and padding
  positions never get logits), in row chunks written into one reused buffer;
- top-k comes first, its first value is the row max, and logsumexp is then computed in place
  on the chunk (`sub_`, `exp_`, `sum`): no extra full-vocabulary copy and no separate max pass.

Determinism: the batch plan depends only on the corpus and the config (sort by
`(length, sample_id)`, greedy packing under a padded-token budget), each rank takes every
`world_size`-th batch of it, and a sample is always computed inside the very same batch. So a
resumed run, a multi-process run and a single-process run compute every sample identically,
and the shard writer gets the same sample order (which makes resumed shards byte-identical).
"""
