"""Black-box mode: pdcheck drives a PD deployment it did not start (the target) and a
single-node baseline (the oracle) over the OpenAI completions API, and compares them."""
