"""Faults as inject/heal pairs, entering only at seams (transports, routing, processes)."""
