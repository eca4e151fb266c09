"""Ways in besides the offline LLM class: the OpenAI-compatible HTTP server and its engine loop.

    python -m nanovllm.entrypoints.serve --model PATH    # or: nanovllm serve --model PATH
"""
