"""The checker role: what PD produced, judged against the oracle.

- `oracle.Oracle`: the single engine with PD's settings and no connector, each answer cached,
  calibrated before it is trusted: bit-for-bit stable means the strict rule, else the tolerant one;
- `compare`: one PD output against the oracle's, as a Verdict (an Outcome, the Rule that judged
  it, where the two first differ); a verdict depends on the two outputs and the rule alone;
- `api`: two OpenAI API answers to the same request, compared field by field.
Nothing here starts or stops an instance or picks what to send: clusters and workloads do.
"""
