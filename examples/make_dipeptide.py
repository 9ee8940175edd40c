"""Make a capped peptide (ACE-X-NME, or ACE-X-Y-...-NME) from the alanine dipeptide PDB with
pdbfixer.

For one residue, alanine is mutated into it; for several, pdbfixer builds the residues after
ACE-ALA (and NME) from a SEQRES record, then mutates each. Missing atoms and hydrogens (pH 7) are
added by pdbfixer and the structure is relaxed by an energy minimisation with the given force
field, so that it is a reasonable reference structure (the generator's internal coordinates
start from it). No conformation is chosen by hand. The script refuses a result with a D amino
acid or a cis peptide bond.

    python examples/make_dipeptide.py VAL --out data/valine_dipeptide.pdb
    python examples/make_dipeptide.py ALA ALA ALA --out data/alanine_tetrapeptide.pdb \
        --forcefield amber14-all.xml implicit/obc2.xml
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from openmm_nice.analysis.observables import dihedrals, peptide_bond_indices
from openmm_nice.io import atomic_write_text

ALANINE = Path(__file__).resolve().parent.parent / "data" / "alanine_dipeptide.pdb"


def _capped_template(n_residues: int) -> str:
    """The alanine dipeptide PDB under a SEQRES record of ACE-ALA...-NME: pdbfixer builds the
    residues the coordinates lack. For more than one residue NME's coordinates are left out, so
    that the new residues are built outwards from ACE-ALA (built into the gap before NME they
    come out strained, some as D amino acids)."""
    atoms = [
        line
        for line in ALANINE.read_text().splitlines()
        if line.startswith(("ATOM", "HETATM")) and (n_residues == 1 or line[17:20] != "NME")
    ]
    sequence = ["ACE", *["ALA"] * n_residues, "NME"]
    seqres = f"SEQRES   1 A {len(sequence):4d}  " + " ".join(sequence)
    return "\n".join([seqres, *atoms, "END"]) + "\n"


def _trans_restraint(topology) -> openmm.CustomTorsionForce:
    """k_trans (1 + cos omega) on every peptide bond: least at omega = 180 degrees."""
    force = openmm.CustomTorsionForce("k_trans * (1 + cos(theta))")
    force.addGlobalParameter("k_trans", 5000.0)  # kJ/mol: above any clash the build leaves
    for torsion in peptide_bond_indices(topology):
        force.addTorsion(*(int(i) for i in torsion), [])
    return force


def _relax(system: openmm.System, topology, positions):
    """Positions minimised with every peptide bond held trans, first without the nonbonded
    forces: a residue built next to a clash (proline's ring on an extended backbone) is otherwise
    pushed through into a cis bond."""
    bonded = openmm.XmlSerializer.clone(system)
    nonbonded = (openmm.NonbondedForce, openmm.CustomGBForce, openmm.GBSAOBCForce)
    for i in reversed(range(bonded.getNumForces())):
        if isinstance(bonded.getForce(i), nonbonded):
            bonded.removeForce(i)
    for stage in (bonded, openmm.XmlSerializer.clone(system)):
        stage.addForce(_trans_restraint(topology))
        context = openmm.Context(
            stage, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
        )
        context.setPositions(positions)
        openmm.LocalEnergyMinimizer.minimize(context, 1.0, 2000)
        positions = context.getState(getPositions=True).getPositions()
    return positions


def _check_structure(topology, positions) -> None:
    """Refuse D amino acids and cis peptide bonds (a built residue can come out either way)."""
    x = np.array(positions.value_in_unit(unit.nanometer))
    residues = list(topology.residues())
    for residue in residues:
        atoms = {a.name: a.index for a in residue.atoms()}
        if {"N", "CA", "C", "CB"} <= set(atoms):
            n, ca, c, cb = (x[atoms[k]] for k in ("N", "CA", "C", "CB"))
            if np.dot(np.cross(n - ca, c - ca), cb - ca) < 0:
                sys.exit(f"residue {residue.name}{residue.id} came out as a D amino acid")
    bonds = peptide_bond_indices(topology)
    atoms = list(topology.atoms())
    for (_, _, n, _), omega in zip(bonds, dihedrals(x[None], bonds)[0]):
        if abs(omega) < np.pi / 2:
            residue = atoms[n].residue
            sys.exit(f"the peptide bond before {residue.name}{residue.id} is cis")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "residues", nargs="+", help="three-letter codes of the residues, e.g. VAL, or ALA ALA ALA"
    )
    p.add_argument("--out", required=True, type=Path, help="the PDB file to write")
    p.add_argument("--forcefield", nargs="+", default=["amber14-all.xml"])
    args = p.parse_args(argv)

    from pdbfixer import PDBFixer

    residues = [r.upper() for r in args.residues]
    fixer = PDBFixer(pdbfile=io.StringIO(_capped_template(len(residues))))
    fixer.findMissingResidues()  # the residues after ACE-ALA, from SEQRES
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    chain = next(fixer.topology.chains()).id
    mutations = [f"ALA-{i + 2}-{r}" for i, r in enumerate(residues) if r != "ALA"]
    if mutations:
        fixer.applyMutations(mutations, chain)
        fixer.findMissingResidues()
        fixer.findMissingAtoms()
        fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)
    forcefield = app.ForceField(*args.forcefield)
    system = forcefield.createSystem(fixer.topology, nonbondedMethod=app.NoCutoff)
    positions = _relax(system, fixer.topology, fixer.positions)
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 2000)
    positions = context.getState(getPositions=True).getPositions()
    _check_structure(fixer.topology, positions)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as handle:
        app.PDBFile.writeFile(fixer.topology, positions, handle)
    energy = (
        context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    )
    record = {
        "command": "python " + shlex.join(["examples/make_dipeptide.py", *sys.argv[1:]]),
        "what": f"ACE-{'-'.join(residues)}-NME made from data/alanine_dipeptide.pdb with "
        f"pdbfixer ({'residues built from SEQRES, ' if len(residues) > 1 else ''}"
        f"{'mutated, ' if mutations else ''}hydrogens added at pH 7), minimised with "
        f"{args.forcefield} (peptide bonds held trans, then free)",
        "atoms": fixer.topology.getNumAtoms(),
        "minimised_energy_kJ_mol": energy,
    }
    atomic_write_text(
        args.out.with_name(args.out.name + ".json"), json.dumps(record, indent=2) + "\n"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
