"""Make a capped amino acid (ACE-X-NME) from the alanine dipeptide PDB with pdbfixer.

The residue is mutated, its missing atoms and hydrogens are added by pdbfixer, and the
structure is relaxed by a short energy minimisation with the force field the examples use, so
that it is a reasonable reference structure (the generator's internal coordinates start from
it). No conformation is chosen by hand: the backbone stays where the alanine PDB has it.

    python examples/make_dipeptide.py VAL --out data/valine_dipeptide.pdb
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import openmm
import openmm.app as app
import openmm.unit as unit

from openmm_nice.io import atomic_write_text

ALANINE = Path(__file__).resolve().parent.parent / "data" / "alanine_dipeptide.pdb"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("residue", help="three-letter code of the new residue, e.g. VAL, SER, PHE")
    p.add_argument("--out", required=True, type=Path, help="the PDB file to write")
    p.add_argument("--forcefield", nargs="+", default=["amber14-all.xml"])
    args = p.parse_args(argv)

    from pdbfixer import PDBFixer

    fixer = PDBFixer(filename=str(ALANINE))
    chain = next(fixer.topology.chains()).id
    fixer.applyMutations([f"ALA-2-{args.residue.upper()}"], chain)
    fixer.findMissingResidues()
    fixer.findMissingAtoms()
    fixer.addMissingAtoms()
    fixer.addMissingHydrogens(7.0)
    forcefield = app.ForceField(*args.forcefield)
    system = forcefield.createSystem(fixer.topology, nonbondedMethod=app.NoCutoff)
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(fixer.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 2000)
    positions = context.getState(getPositions=True).getPositions()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as handle:
        app.PDBFile.writeFile(fixer.topology, positions, handle)
    energy = (
        context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    )
    record = {
        "command": "python " + shlex.join(["examples/make_dipeptide.py", *sys.argv[1:]]),
        "what": f"ACE-{args.residue.upper()}-NME made from data/alanine_dipeptide.pdb with "
        f"pdbfixer's mutation, hydrogens added, minimised with {args.forcefield}",
        "atoms": fixer.topology.getNumAtoms(),
        "minimised_energy_kJ_mol": energy,
    }
    atomic_write_text(
        args.out.with_name(args.out.name + ".json"), json.dumps(record, indent=2) + "\n"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
