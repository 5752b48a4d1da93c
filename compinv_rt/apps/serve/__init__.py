"""`compinv-rt serve`: online generation over HTTP.

FastAPI + uvicorn in front of one GenerationSession (the same orchestration `generate` and `--jobs`
use): a dynamic batcher packs compatible requests into one UNet batch, each item with its own
concepts, layout, guidance and seed. Only the standard library is imported here.
"""
