"""Pairwise masking under the encryption (SecAgg+ over CKKS): no coalition of the aggregator with
fewer than ``t`` sites can read one site's update, and sites may drop out.

Each site adds to the first polynomial c0 of every ciphertext it sends values modulo q that look
uniformly random and cancel in the sum: a self mask PRG(b_i) and, for every neighbour j, +/- PRG(s_ij)
with s_ij agreed by X25519. ``b_i`` and the mask-agreement secret key are Shamir-shared (threshold
``t``) among the site's neighbours, encrypted to each of them, so that after the submissions the
aggregator can remove the self masks of the sites that submitted and the pairwise masks of those
that dropped out, never both for one site. The protocol is Bonawitz et al. (CCS 2017) with the
neighbour graph of Bell et al. (CCS 2020); the design and what it does not cover are in
``docs/design-aggregator-adversary.md`` ("Masked rounds").

Modules: :mod:`.shamir` (secret sharing), :mod:`.prg` (masks modulo q), :mod:`.graph` (neighbours,
default degree and threshold), :mod:`.statements` (signed statements every site checks),
:mod:`.site` (a site's side of the four stages), :mod:`.stages` (the aggregator's side: relay, stage
machine, unmasking). None of them needs TenSEAL: the aggregator runs them too.
"""
