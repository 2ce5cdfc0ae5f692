"""Maps the top-level source folders onto the ``clearip`` import namespace.

``relay/`` installs as ``clearip.relay``, ``ctl/`` as ``clearip.ctl`` and ``bpf/`` as
``clearip.bpf``; sub-packages are found automatically so a new folder cannot be forgotten.
"""

from setuptools import find_packages, setup

FOLDERS = ("relay", "ctl", "bpf")

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder in FOLDERS:
    top = f"clearip.{folder}"
    packages.append(top)
    package_dir[top] = folder
    packages.extend(f"{top}.{sub}" for sub in find_packages(folder))

setup(packages=packages, package_dir=package_dir)
