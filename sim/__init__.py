"""The embedded local setup: an AWS emulator (moto) and simulated login nodes (real sshd).

For development, the test suite and the README's demo only; it needs the `test` extra and root.
Nothing in the daemon imports it.
"""
