"""`skillkv serve`: an OpenAI-compatible server that keeps skills hot (resident in the KV pool) between questions.

  protocol.py   request/response/error shapes (OpenAI chat completions + skillkv extensions)
  messages.py   the prompt mapping: chat messages -> question segment after the skills
  scheduler.py  continuous batching (torch-free): admission, page reservation, one step = prefills + decodes
  worker.py     the engine thread: owns SkillKV, PagedEngine and the watcher; samples, streams, frees pages
  app.py        FastAPI routes, SSE, disconnects
  server.py     wiring and uvicorn (foreground for the CLI, background thread for tests and the load test)
  client.py     `skillkv ask --server URL`
  loadtest.py   64 concurrent clients: every answer equal to the solo answer; TTFT p50/p99, throughput
"""
