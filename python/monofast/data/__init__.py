"""Stage 1: the corpus and the tokenizer (`monofast data`): corpus, tokenizer, prepare (the
stage), splits (its files as later stages read them)."""
