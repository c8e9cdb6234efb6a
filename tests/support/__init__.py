"""Helpers the test layers share: the lab (sshd nodes, moto), the daemon as a process, fakes."""
