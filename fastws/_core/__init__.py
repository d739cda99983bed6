"""The compiled hot path of fastws. See fanout.pyx for why it is shaped as it is."""
