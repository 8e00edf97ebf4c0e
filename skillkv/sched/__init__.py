"""Requests and the one engine loop that runs them: `request.Req`, `scheduler.Scheduler` (continuous batching),
`loop.Loop` (schedule -> run -> postprocess), shared by `skillkv ask` and `skillkv serve`."""
