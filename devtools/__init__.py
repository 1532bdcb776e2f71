"""Development tools that the tests and the benchmarks share (not part of the installed
packages): ``fakewandb``, a stand-in wandb backend on 127.0.0.1."""
