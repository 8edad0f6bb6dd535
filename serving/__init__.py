"""OpenAI-compatible serving: a built-in batching engine for CPU / small GPUs, or a gateway in front of vLLM.

Start-up is a visible lifecycle (see `serving.server.run`): load engine -> bind socket -> build app -> serve.
"""
