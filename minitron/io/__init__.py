"""Everything that touches files: text data loading and packing (:mod:`.data`), checkpoints
(:mod:`.checkpoint`), tokenizers (:mod:`.tokenizer`), atomic writes (:mod:`.files`), input resolution
(:mod:`.inputs`), the output-safety rule (:mod:`.safety`) and plots (:mod:`.plotting`).

Submodules are imported on demand (``from minitron.io.data import load_packed``).
"""
