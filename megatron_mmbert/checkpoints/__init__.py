"""Checkpoint folders: the one package that knows what they hold and how they are read and written.

* :mod:`.layout` -- the file names of a checkpoint folder (the model-config file, the tokenizer
  subfolder, megatron-core's completion marker, a run's ``latest`` pointer), format detection, the
  model-config file and tokenizer copying;
* :mod:`.dist` -- megatron-core ``dist_checkpointing`` saves and loads, training checkpoints
  (optimizer, position, ``latest``, retention);
* :mod:`.dcp_io` -- the safety adjustments to megatron-core / torch DCP reads and writes
  (allow-listed unpickler, weights-only loads, file digests);
* :mod:`.tensors` -- tensor-at-a-time readers and writers: the Hugging Face safetensors reader
  (index honoured, ``.bin`` refused), the streaming safetensors writer, and a dist checkpoint read
  one tensor (or row block) at a time at any layout.

``convert/``, ``merge/`` and ``training/`` go through this package; nothing else spells a layout.
"""
