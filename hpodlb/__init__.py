"""hpodlb: the head-node daemon that keeps HyperPod login nodes behind an NLB, with one SSH identity."""

__version__ = "0.1.0"
