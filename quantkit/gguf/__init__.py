"""GGUF: llama.cpp's container — block encoders, mixes, writer, reader, tokenizer export, imatrix."""
