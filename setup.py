"""Maps the top-level folders into the `circuitscan` package.

`circuitscan/` holds the package itself: its small, lazily imported top level
(`import circuitscan as cs`) and `circuitscan.testing`. The layer folders
`schemas/`, `pipelines/` and `services/` install as `circuitscan.schemas`,
`circuitscan.pipelines` and `circuitscan.services`, so no bare top-level name
lands in site-packages.
"""

from setuptools import find_packages, setup

ROOTS = ("schemas", "pipelines", "services")

packages: list[str] = ["circuitscan"]
packages += [f"circuitscan.{sub}" for sub in find_packages("circuitscan")]
package_dir: dict[str, str] = {"circuitscan": "circuitscan"}
for root in ROOTS:
    package_dir[f"circuitscan.{root}"] = root
    packages.append(f"circuitscan.{root}")
    packages += [f"circuitscan.{root}.{sub}" for sub in find_packages(root)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "circuitscan.services": [
            "default_saes/*/*.json",
            "default_saes/*/*.safetensors",
            "web/*",
        ],
    },
    include_package_data=False,
)
