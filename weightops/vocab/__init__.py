"""Vocabulary merging: the output tokenizer and embeddings re-indexed to it.

`config` holds the recipe keys, `build` makes the merged tokenizer (union, base or a
model's), `rows` decides where each output embedding row of each input comes from and
gathers those rows as the tensors are read, and `plan` ties them into the merge plan.
"""
