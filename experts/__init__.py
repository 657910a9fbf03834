"""The shipped expert (package data, ``rims_rl.experts``): a SAC actor for HalfCheetah-v5 (``rims-rl demos``)."""
