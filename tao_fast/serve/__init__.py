"""`tao-fast serve`: an OpenAI-compatible server for the tuned model that logs its own traffic
(the inference table `tao-fast ingest` and `tune --follow` read) and switches to each new round.

  app.py            the FastAPI app: /v1/chat/completions (JSON and SSE), /v1/models, /health
  validation.py     a chat-completions body -> ChatRequest, or an ApiError (OpenAI error body)
  backend.py        the Backend protocol: what the app needs of a model server
  batcher.py        the micro-batcher: waiting requests in one engine.generate call, one thread
  torch_backend.py  the backend over tao_fast's torch engine
  vllm_backend.py   the backend proxying to vLLM's own server (vllm_server.VllmServer)
  vllm_server.py    VllmServer: vLLM's OpenAI-compatible server in a child process
  request_log.py    the request log: a bounded queue, a writer thread, atomic gzip rotation
  redact.py         --redact python:module:function, run in a sandbox.Worker
  versions.py       --model PATH|RUN_DIR: the newest round, the watcher, the reference-counted
                    switch
  server.py         building it all from the command line's options; uvicorn; shutdown
"""
