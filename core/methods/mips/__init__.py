"""MIPS: program synthesis from trained recurrent networks (normalise, find the lattice, regress, emit Python)."""
