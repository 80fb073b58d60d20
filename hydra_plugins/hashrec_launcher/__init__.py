"""hashrec's Hydra plugins. Hydra loads launchers only from the ``hydra_plugins`` namespace
package (this folder has no ``__init__.py`` one level up, so it joins the installed plugins'),
and finds this one when the repository root is on ``sys.path``: ``python -m train`` run from
the checkout, as the README's commands are."""
