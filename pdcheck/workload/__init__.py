"""Workloads: what is sent, built from a seed and seeded RNGs, never from module-level randomness.

- `boundary`: prompt lengths around block boundaries (b-1, b, b+1, ...), where slicing slips show;
- `phases`: the named phases both modes share (boundaries, repeats, shared prefixes, bursts, long
  prompts), each from an RNG of its own, so picking some phases leaves their prompts unchanged;
- `api`: one ApiCase per sampling or output option a client can set.
The same seed gives the same requests; sending them is the client's part (pdcheck.client).
"""
