"""Reproducers: the replay line of a failing request (`command`), repro.json replayed and shrunk
(`case`), and the standalone script a repro exports (`script`)."""
