"""Molecules: systems to sample, Z-matrices from the bond graph, the exact internal-coordinate
bijection, the torsion densities and the coordinate map from flow space to Cartesians."""
