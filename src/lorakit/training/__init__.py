"""The training wing (STYLE.md's layout): the loop's parts that are not tasks or surfaces.

:mod:`.schedule` builds the learning-rate schedule: transformers' ``get_scheduler``'s, written out;
:mod:`.loop` counts a run's optimizer steps (gradient accumulation, ``max_steps``) and says when it
evaluates, saves and logs, and runs one optimizer step's micro-batches; :mod:`.datasets` reads
training rows from files, save_to_disk folders and Hub datasets, with a column mapping;
:mod:`.packing` packs a causal LM's training rows into ``max_length`` sequences (``--packing``);
:mod:`.sharded_save` saves from an FSDP2-sharded model, every process checking its own slice of what was written.
"""

__all__: list[str] = []
