"""Small test scenes built with Blender's own Python, saved as packed .blend files.

Scenes are built rather than checked in, so the tests use the Blender that is installed
and no binary fixture can drift from it. Each scene is tiny: a 64x48 render at a few
samples takes milliseconds per frame.

Variants:

* ``cube``: a red cube that moves and turns over frames 1..6, a sun, a camera, a world;
* ``empty``: the camera and a uniform world only, so every pixel has one colour;
* ``external``: the cube scene plus an image that is *not* packed (a file next to the
  .blend), which the runtime must refuse;
* ``textured``: the cube scene whose material takes its colour from an image that is
  *not* packed but referenced relatively as ``//textures/checker.png`` (written next to
  the .blend at build time): the runtime renders it only when the request's asset
  manifest supplies that file;
* ``autoexec``: the cube scene plus a text block registered to run on load, which would
  write ``<path>.autorun-marker`` if Blender ran scripts from the file;
* ``stereo``, ``stereo-sbs``: the cube scene set up for stereo (multiview) output, each
  view to its own file, or both side by side in one image twice as wide;
* ``layers``: the cube scene whose view layer asks for 2000 samples of its own, plus two
  more enabled view layers (``extra0``, ``extra1``) that ask for as many;
* ``rigidbody``: the cube scene plus a second cube that falls from frame 1 on as an
  unbaked rigid body simulation, so frame N depends on the frames before it;
* ``badname``: the cube scene whose view layer's name holds a newline and a line of
  Blender's own out-of-memory wording (Blender prints layer names in its log).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

BLENDER = shutil.which("blender") or "blender"
WIDTH, HEIGHT, FRAMES = 64, 48, 6

_BUILD = r"""
import math
import sys

import bmesh
import bpy


def keyframe(block, path, value):  # a constant keyframe at frame 1, in a plain action
    data = block.animation_data or block.animation_data_create()
    data.action = data.action or bpy.data.actions.new("act_" + block.name)
    curve = data.action.fcurves.new(data_path=path, index=0)
    curve.keyframe_points.insert(1, value).interpolation = "CONSTANT"


def png_file(path, color):  # a 4x4 PNG of one colour at path, not kept in the file
    image = bpy.data.images.new("png", 4, 4)
    image.generated_color = color
    image.filepath_raw = path
    image.file_format = "PNG"
    image.save()
    bpy.data.images.remove(image)


def file_output(tree, name, base_path):
    node = tree.nodes.new("CompositorNodeOutputFile")
    node.name = name
    node.base_path = base_path
    tree.links.new(tree.nodes["Render Layers"].outputs["Image"], node.inputs[0])
    return node


def build(out, variant):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.frame_start, scene.frame_end = 1, 6
    world = bpy.data.worlds.new("world")
    world.color = (0.05, 0.05, 0.08)
    scene.world = world
    cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    cam.location = (0, -5, 2.5)
    cam.rotation_euler = (math.radians(65), 0, 0)
    scene.collection.objects.link(cam)
    scene.camera = cam
    if variant != "empty":
        mesh = bpy.data.meshes.new("cube")
        bm = bmesh.new()
        bmesh.ops.create_cube(bm, size=1.0)
        bm.to_mesh(mesh)
        bm.free()
        cube = bpy.data.objects.new("cube", mesh)
        scene.collection.objects.link(cube)
        mat = bpy.data.materials.new("red")
        mat.use_nodes = True
        bsdf = mat.node_tree.nodes["Principled BSDF"]
        bsdf.inputs["Base Color"].default_value = (0.8, 0.1, 0.1, 1)
        mesh.materials.append(mat)
        for f in range(1, 7):
            cube.location = (0.3 * (f - 3), 0, 0)
            cube.rotation_euler = (0, 0, 0.4 * f)
            cube.keyframe_insert("location", frame=f)
            cube.keyframe_insert("rotation_euler", frame=f)
        sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
        sun.data.energy = 3
        sun.rotation_euler = (0.6, 0.2, 0.3)
        scene.collection.objects.link(sun)
        bpy.ops.file.pack_all()
    if variant == "external":
        image = bpy.data.images.new("texture", 4, 4)
        image.filepath_raw = out + ".texture.png"
        image.file_format = "PNG"
        image.save()
        image.use_fake_user = True  # kept in the file, and left unpacked on purpose
    if variant == "textured":
        import os

        folder = os.path.join(os.path.dirname(out), "textures")
        os.makedirs(folder, exist_ok=True)
        image = bpy.data.images.new("checker", 8, 8)
        image.generated_type = "COLOR_GRID"
        image.filepath_raw = os.path.join(folder, "checker.png")
        image.file_format = "PNG"
        image.save()
        image.source = "FILE"
        mat = bpy.data.materials["red"]
        tex = mat.node_tree.nodes.new("ShaderNodeTexImage")
        tex.image = image
        tex.interpolation = "Closest"
        bsdf = mat.node_tree.nodes["Principled BSDF"]
        mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    if variant == "autoexec":
        # Registered as a module, this text runs when the file loads, unless -Y stops it.
        text = bpy.data.texts.new("autorun.py")
        text.use_module = True
        text.write("open(%r, 'w').write('ran')\n" % (out + ".autorun-marker"))
    if variant in ("stereo", "stereo-sbs"):
        scene.render.use_multiview = True
        scene.render.views_format = "STEREO_3D"
        views = scene.render.image_settings
        views.views_format = "INDIVIDUAL" if variant == "stereo" else "STEREO_3D"
        views.stereo_3d_format.display_mode = "SIDEBYSIDE"
    if variant == "layers":
        scene.view_layers[0].samples = 2000
        for i in range(2):
            scene.view_layers.new("extra%d" % i).samples = 2000
    if variant == "denoise":  # a compositor Denoise node, in the scene's tree and a group
        scene.use_nodes = True
        tree = scene.node_tree
        denoise = tree.nodes.new("CompositorNodeDenoise")
        tree.links.new(tree.nodes["Render Layers"].outputs["Image"], denoise.inputs["Image"])
        tree.links.new(denoise.outputs["Image"], tree.nodes["Composite"].inputs["Image"])
        group = bpy.data.node_groups.new("denoiser", "CompositorNodeTree")
        group.nodes.new("CompositorNodeDenoise")
        group.use_fake_user = True
    if variant == "stamp":  # the node's hostname and clock, burnt in by a keyframe
        r = scene.render
        r.use_stamp_date = r.use_stamp_time = r.use_stamp_hostname = True
        keyframe(scene, "render.use_stamp", 1.0)
    if variant == "timelimit":  # a driver (a simple expression, which -Y lets run)
        driver = scene.driver_add("cycles.time_limit").driver
        driver.type, driver.expression = "SCRIPTED", "0.3"
    if variant in ("fileout", "fileout-unmuted"):  # writes where the scene says
        scene.use_nodes = True
        node = file_output(scene.node_tree, "FO", out + ".fileout/")
        if variant == "fileout-unmuted":
            node.mute = True  # and a keyframe that switches it back on
            keyframe(scene.node_tree, 'nodes["FO"].mute', 0.0)
    if variant == "geomute":  # a geometry-nodes node's mute, keyframed: pins nothing
        group = bpy.data.node_groups.new("wobble", "GeometryNodeTree")
        group.inputs.new("NodeSocketGeometry", "Geometry")
        group.outputs.new("NodeSocketGeometry", "Geometry")
        ins, outs = group.nodes.new("NodeGroupInput"), group.nodes.new("NodeGroupOutput")
        node = group.nodes.new("GeometryNodeSetPosition")
        group.links.new(ins.outputs[0], node.inputs["Geometry"])
        group.links.new(node.outputs["Geometry"], outs.inputs[0])
        bpy.data.objects["cube"].modifiers.new("wobble", "NODES").node_group = group
        keyframe(group, 'nodes["Set Position"].mute', 1.0)
    if variant == "movie":  # packed, but a movie: read from its absolute path, not the pack
        png_file(out + ".secret.png", (0.0, 1.0, 0.0, 1.0))  # green: the node's file
        png_file(out + ".decoy.png", (1.0, 0.0, 1.0, 1.0))  # magenta: what is packed
        decoy = bpy.data.images.load(out + ".decoy.png")
        decoy.pack()
        decoy.source = "MOVIE"
        decoy.filepath = out + ".secret.png"
        mat = bpy.data.materials["red"]
        tex = mat.node_tree.nodes.new("ShaderNodeTexImage")
        tex.image = decoy
        emit = mat.node_tree.nodes.new("ShaderNodeEmission")
        mat.node_tree.links.new(tex.outputs["Color"], emit.inputs["Color"])
        output = mat.node_tree.nodes["Material Output"]
        mat.node_tree.links.new(emit.outputs["Emission"], output.inputs["Surface"])
    if variant == "idprop":  # Cycles' settings reached as ID properties, not by attribute
        keyframe(scene, '["cycles"]["samples"]', 64.0)
        keyframe(scene, '["cycles"]["time_limit"]', 0.01)
    if variant == "customprop":  # the scene's own custom property, keyframed: pins nothing
        scene["ctrl"] = 0.0
        keyframe(scene, '["ctrl"]', 1.0)
    if variant == "fileout-scene":  # a File Output's mute, keyframed from the scene itself
        scene.use_nodes = True
        file_output(scene.node_tree, "FO", out + ".fileout/").mute = True
        keyframe(scene, 'node_tree.nodes["FO"].mute', 0.0)
    if variant == "stamp-pointer":  # the stamp, reached through a Render Layers node
        scene.use_nodes = True
        r = scene.render
        r.use_stamp_date = r.use_stamp_time = r.use_stamp_hostname = True
        keyframe(scene, 'node_tree.nodes["Render Layers"].scene.render.use_stamp', 1.0)
    if variant == "stamp-tree-pointer":  # the same, keyframed on the compositor's tree
        scene.use_nodes = True
        scene.render.use_stamp_hostname = True
        keyframe(scene.node_tree, 'nodes["Render Layers"].scene.render.use_stamp', 1.0)
    if variant == "stamp-backslash":  # the same, the node named so that its key ends in \\
        scene.use_nodes = True
        scene.render.use_stamp_hostname = True
        scene.node_tree.nodes["Render Layers"].name = "R\\"
        keyframe(scene, 'node_tree.nodes["R\\\\"].scene.render.use_stamp', 1.0)
    if variant == "exposure":  # an animated view transform: the requester's, pins nothing
        keyframe(scene, "view_settings.exposure", 0.5)
    if variant == "nocam-composited":  # the compositor renders a scene with no camera
        scene.use_nodes = True
        other = bpy.data.scenes.new("Other")
        other.render.engine = "CYCLES"
        tree = scene.node_tree
        layers = tree.nodes.new("CompositorNodeRLayers")
        layers.scene = other
        mix = tree.nodes.new("CompositorNodeMixRGB")
        tree.links.new(tree.nodes["Render Layers"].outputs["Image"], mix.inputs[1])
        tree.links.new(layers.outputs["Image"], mix.inputs[2])
        tree.links.new(mix.outputs[0], tree.nodes["Composite"].inputs["Image"])
    if variant == "cachename":  # a cloth disk cache, named by a marker the test rewrites
        cloth = bpy.data.objects["cube"].modifiers.new("cloth", "CLOTH")
        cloth.point_cache.name = "CACHENAMEMARKER00"  # 17 bytes, as "../../../../tmp/x"
    if variant == "badname":
        scene.view_layers[0].name = "ViewLayer\nError: Out of memory"
    if variant == "rigidbody":
        mesh = bpy.data.meshes.new("faller")
        bm = bmesh.new()
        bmesh.ops.create_cube(bm, size=0.6)
        bm.to_mesh(mesh)
        bm.free()
        mesh.materials.append(bpy.data.materials["red"])
        faller = bpy.data.objects.new("faller", mesh)
        faller.location = (0, 0, 2.0)
        scene.collection.objects.link(faller)
        bpy.context.view_layer.objects.active = faller
        faller.select_set(True)
        bpy.ops.rigidbody.world_add()
        bpy.ops.rigidbody.object_add()
        scene.rigidbody_world.point_cache.frame_start = 1
        scene.frame_current = 1
    # uncompressed where the test rewrites bytes of it
    bpy.ops.wm.save_as_mainfile(filepath=out, compress=variant != "cachename")
    if variant == "cachename":  # a disk cache needs a saved file
        bpy.data.objects["cube"].modifiers["cloth"].point_cache.use_disk_cache = True
        bpy.ops.wm.save_mainfile(compress=False)
    if variant == "textured":  # now that the file has a folder, "//" means that folder
        bpy.data.images["checker"].filepath = "//textures/checker.png"
        bpy.ops.wm.save_mainfile(compress=True)


args = sys.argv[sys.argv.index("--") + 1 :]
for out, variant in zip(args[::2], args[1::2]):
    build(out, variant)
"""


def build_scenes(directory: Path, variants: tuple[str, ...]) -> dict[str, bytes]:
    """Build each variant as ``<directory>/<variant>.blend`` in one Blender run."""
    script = directory / "build_scenes.py"
    script.write_text(_BUILD)
    args = [item for v in variants for item in (str(directory / f"{v}.blend"), v)]
    subprocess.run(
        [BLENDER, "-b", "--factory-startup", "-Y", "-noaudio", "--python-exit-code", "1",
         "-P", str(script), "--", *args],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return {v: (directory / f"{v}.blend").read_bytes() for v in variants}
