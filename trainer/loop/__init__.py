"""The training loop and its parts: `build` (everything before the first step), `train_loop` (the loop),
`step` (one optimizer step and the non-finite bookkeeping), `window` (log-window means), `losses`,
`optim` (parameter groups and the LR function), `eval_loop`, `metrics` (jsonl, TensorBoard, progress)
and `visualize` (kept-token overlays). Imports no command-line tool."""
