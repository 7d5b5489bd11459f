"""lfsfmt against the exact bytes Lustre prints (reference §1.2, §1.4, §2.4, §2.5).

Expected strings are real Lustre output quoted in the reference or in public
site documentation, or built from the printf formats of lfs.c/liblustreapi.
"""

from lustrefuse import hsm
from lustrefuse.lfsfmt import (
    Show,
    df_text,
    getstripe_dir,
    getstripe_file,
    hsm_action_line,
    hsm_state_line,
    no_stripe_info,
)

MiB = 1 << 20
FID = "[0x200000400:0x2:0x0]"


# --- hsm_state ---------------------------------------------------------------

def test_hsm_state_real_outputs():
    assert (hsm_state_line("/mnt/lustre/foo", 0x9, 5)
            == "/mnt/lustre/foo: (0x00000009) exists archived, archive_id:5")
    assert (hsm_state_line("/shared/SEG_C3NA_Velocity.sgy", hsm.IMPORTED, 1)
            == "/shared/SEG_C3NA_Velocity.sgy: (0x0000000d) released exists archived, archive_id:1")
    assert hsm_state_line("gfw1", hsm.EXISTS, 1) == "gfw1: (0x00000001) exists, archive_id:1"


def test_hsm_state_never_archived_has_no_words_and_no_archive_id():
    assert hsm_state_line("FILE", 0, 0) == "FILE: (0x00000000)"


def test_hsm_state_word_order_is_fixed():
    assert hsm_state_line("f", hsm.FLAGS_MASK, 2) == (
        "f: (0x0000007f) released exists dirty archived never_release never_archive "
        "lost_from_hsm, archive_id:2")
    assert hsm_state_line("f", hsm.EXISTS | hsm.DIRTY | hsm.ARCHIVED, 1) == (
        "f: (0x0000000b) exists dirty archived, archive_id:1")


# --- hsm_action --------------------------------------------------------------

def test_hsm_action_noop():
    assert hsm_action_line("f", {"action": "NOOP"}) == "f: NOOP"
    assert hsm_action_line("f", None) == "f: NOOP"


def test_hsm_action_waiting_whole_file():
    act = {"action": "RESTORE", "state": "waiting", "bytes": 0, "offset": 0, "length": -1}
    assert hsm_action_line("f", act) == "f: RESTORE waiting (from 0 to EOF)"


def test_hsm_action_running_shows_bytes_moved():
    act = {"action": "ARCHIVE", "state": "running", "bytes": 1048576, "offset": 0, "length": -1}
    assert hsm_action_line("f", act) == "f: ARCHIVE running (1048576 bytes moved)"
    act["action"] = "RESTORE"
    assert hsm_action_line("f", act) == "f: RESTORE running (1048576 bytes moved)"


def test_hsm_action_other_states_and_extents():
    act = {"action": "REMOVE", "state": "running", "offset": 0, "length": -1}
    assert hsm_action_line("f", act) == "f: REMOVE running (from 0 to EOF)"
    act = {"action": "RESTORE", "state": "done", "offset": 0, "length": 4096}
    assert hsm_action_line("f", act) == "f: RESTORE done (from 0 to 4096)"
    act = {"action": "RELEASE", "state": "bogus"}
    assert hsm_action_line("f", act) == "f: RELEASE unknown (from 0 to EOF)"


def test_hsm_action_accepts_numeric_codes():
    act = {"action": int(hsm.Action.RESTORE), "state": int(hsm.Progress.RUNNING), "bytes": 7}
    assert hsm_action_line("f", act) == "f: RESTORE running (7 bytes moved)"


# --- getstripe: files --------------------------------------------------------

def _layout(objects, size=MiB, released=False, gen=0):
    return {"stripe_size": size, "stripe_count": len(objects), "gen": gen,
            "osts": [o["ost"] for o in objects], "pattern": "raid0", "released": released,
            "objects": objects}


def test_getstripe_file_reference_example():
    lay = _layout([{"ost": 0, "objid": 98, "group": 0}])
    assert getstripe_file("/mnt/lustre/test_file", FID, lay) == (
        "/mnt/lustre/test_file\n"
        "lmm_stripe_count:  1\n"
        "lmm_stripe_size:   1048576\n"
        "lmm_pattern:       raid0\n"
        "lmm_layout_gen:    0\n"
        "lmm_stripe_offset: 0\n"
        "\tobdidx\t\t objid\t\t objid\t\t group\n"
        "\t     0\t            98\t         0x62\t             0\n"
        "\n")


def test_getstripe_file_four_stripes_from_offset_10():
    objs = [{"ost": 10 + i, "objid": 3024641 + i, "group": 0} for i in range(4)]
    text = getstripe_file("f", FID, _layout(objs))
    assert "lmm_stripe_count:  4\n" in text
    assert "lmm_stripe_offset: 10\n" in text
    assert "\t    10\t       3024641\t     0x2e2701\t             0\n" in text
    assert text.endswith("\t    13\t       3024644\t     0x2e2704\t             0\n\n")


def test_getstripe_group_outside_mdt0_prints_in_hex():
    # real rows: "5 19156534 0x1244e36 0x800000400", "52 19080069 0x1232385 0x1380000400"
    objs = [{"ost": 5, "objid": 19156534, "group": 0x800000400},
            {"ost": 52, "objid": 19080069, "group": 0x1380000400}]
    text = getstripe_file("f", FID, _layout(objs))
    assert "\t     5\t      19156534\t    0x1244e36\t   0x800000400\n" in text
    assert "\t    52\t      19080069\t    0x1232385\t  0x1380000400\n" in text


def test_getstripe_objid_zero_prints_like_c():
    text = getstripe_file("f", FID, _layout([{"ost": 1, "objid": 0, "group": 0}]))
    assert "\t     1\t             0\t            0\t             0\n" in text


def test_getstripe_released_file_has_no_object_table():
    lay = _layout([{"ost": 0, "objid": 2, "group": 0}], released=True)
    assert getstripe_file("/mnt/f", FID, lay) == (
        "/mnt/f\n"
        "lmm_stripe_count:  1\n"
        "lmm_stripe_size:   1048576\n"
        "lmm_pattern:       released\n"
        "lmm_layout_gen:    0\n"
        "lmm_stripe_offset: 0\n"
        "\n")


def test_getstripe_single_fields_print_bare_values():
    lay = _layout([{"ost": 3, "objid": 2, "group": 0}, {"ost": 4, "objid": 2, "group": 0}],
                  size=4 * MiB, gen=5)
    bare = {"print_path": False}
    assert getstripe_file("f", FID, lay, Show.COUNT, **bare) == "2\n\n"
    assert getstripe_file("f", FID, lay, Show.SIZE, **bare) == "4194304\n\n"
    assert getstripe_file("f", FID, lay, Show.OFFSET, **bare) == "3\n\n"
    assert getstripe_file("f", FID, lay, Show.PATTERN, **bare) == "raid0\n\n"
    assert getstripe_file("f", FID, lay, Show.GEN, **bare) == "5\n\n"
    assert getstripe_file("f", FID, lay, Show.FID, **bare) == "[0x200000400:0x2:0x0]\n\n"
    released = dict(lay, released=True)
    assert getstripe_file("f", FID, released, Show.PATTERN, **bare) == "released\n\n"


def test_getstripe_two_fields_get_labels():
    lay = _layout([{"ost": 0, "objid": 2, "group": 0}])
    assert getstripe_file("f", FID, lay, Show.COUNT | Show.SIZE, print_path=False) == (
        "lmm_stripe_count:  1\nlmm_stripe_size:   1048576\n\n")
    assert getstripe_file("f", FID, lay, Show.FID | Show.COUNT, print_path=False) == (
        "lmm_fid:           [0x200000400:0x2:0x0]\nlmm_stripe_count:  1\n\n")


def test_getstripe_quiet_prints_objects_only():
    lay = _layout([{"ost": 0, "objid": 98, "group": 0}])
    assert getstripe_file("f", FID, lay, Show.OBJID) == (
        "f\n"
        "\tobdidx\t\t objid\t\t objid\t\t group\n"
        "\t     0\t            98\t         0x62\t             0\n"
        "\n")


def test_getstripe_verbose_adds_magic_seq_object_id_and_fid():
    lay = _layout([{"ost": 0, "objid": 98, "group": 0}])
    text = getstripe_file("f", FID, lay, Show.DEFAULT | Show.DETAIL)
    assert text.startswith(
        "f\n"
        "lmm_magic:         0x0BD10BD0\n"
        "lmm_seq:           0x200000400\n"
        "lmm_object_id:     0x2\n"
        "lmm_fid:           [0x200000400:0x2:0x0]\n"
        "lmm_stripe_count:  1\n")


def test_getstripe_yaml_plain_file():
    objs = [{"ost": 0, "objid": 2, "group": 0}, {"ost": 1, "objid": 2, "group": 0}]
    assert getstripe_file("f", FID, _layout(objs), yaml=True) == (
        "lmm_stripe_count:  2\n"
        "lmm_stripe_size:   1048576\n"
        "lmm_pattern:       raid0\n"
        "lmm_layout_gen:    0\n"
        "lmm_stripe_offset: 0\n"
        "lmm_objects:\n"
        "      - l_ost_idx: 0\n"
        "        l_fid:     0x100000000:0x2:0x0\n"
        "      - l_ost_idx: 1\n"
        "        l_fid:     0x100010000:0x2:0x0\n"
        "\n")


def test_getstripe_ost_filter_marks_the_row():
    objs = [{"ost": 0, "objid": 2, "group": 0}, {"ost": 1, "objid": 3, "group": 0}]
    text = getstripe_file("f", FID, _layout(objs), ost=1)
    assert "\t     1\t             3\t          0x3\t             0 *\n" in text
    assert "\t     0\t" not in text
    assert getstripe_file("f", FID, _layout(objs), ost=7) == ""


def test_no_stripe_info():
    assert no_stripe_info("d/link") == "d/link has no stripe info\n"


# --- getstripe: directories --------------------------------------------------

FS_DEFAULT = {"stripe_size": MiB, "stripe_count": 1, "stripe_offset": -1}


def test_getstripe_dir_with_default_layout():
    # real output after "lfs setstripe -c 4 striped/"
    default = {"stripe_size": 0, "stripe_count": 4, "stripe_offset": -1}
    assert getstripe_dir("striped/", default, FS_DEFAULT) == (
        "striped/\n"
        "stripe_count:  4 stripe_size:   1048576 pattern:       raid0 stripe_offset: -1\n"
        "\n")


def test_getstripe_dir_without_default_shows_fs_defaults_and_pattern_0():
    # real "lfs getstripe -d" and "lfs getstripe -d --raw" of an unstriped directory
    assert getstripe_dir("d", None, FS_DEFAULT, print_path=False) == (
        "stripe_count:  1 stripe_size:   1048576 pattern:       0 stripe_offset: -1\n\n")
    unset = {"stripe_size": 0, "stripe_count": 0, "stripe_offset": -1}
    assert getstripe_dir("d", unset, FS_DEFAULT, print_path=False, raw=True) == (
        "stripe_count:  0 stripe_size:   0 pattern:       0 stripe_offset: -1\n\n")


def test_getstripe_dir_single_fields_and_yaml():
    default = {"stripe_size": 4 * MiB, "stripe_count": -1, "stripe_offset": 2}
    assert getstripe_dir("d", default, FS_DEFAULT, Show.COUNT, print_path=False) == "-1\n\n"
    assert getstripe_dir("d", default, FS_DEFAULT, Show.OFFSET, print_path=False) == "2\n\n"
    assert getstripe_dir("d", default, FS_DEFAULT, yaml=True) == (
        "stripe_count:  -1\nstripe_size:   4194304\npattern:       raid0\nstripe_offset: 2\n\n")


# --- df ----------------------------------------------------------------------

def _target(index, total_kib, used_kib, avail_kib, files=1000, ffree=900):
    return {"index": index, "blocks": total_kib * 1024, "bfree": (total_kib - used_kib) * 1024,
            "bavail": avail_kib * 1024, "files": files, "ffree": ffree}


def test_df_rows_match_real_output():
    # "exacloud-OST0011_UUID   529449792        1260   524063440   1% /mnt/exacloud[OST:17]"
    df = {"fsname": "exacloud", "mdts": [], "osts": [_target(17, 529449792, 1260, 524063440)]}
    lines = df_text(df, "/mnt/exacloud").split("\n")
    assert lines[0] == "UUID                   1K-blocks        Used   Available Use% Mounted on"
    assert lines[1] == (
        "exacloud-OST0011_UUID   529449792        1260   524063440   1% /mnt/exacloud[OST:17]")


def test_df_layout_header_rows_blank_summary_blank():
    df = {"fsname": "lustrefuse", "mount": "/mnt/x",
          "mdts": [_target(0, 1000, 100, 900, files=100, ffree=90)],
          "osts": [_target(0, 4000, 1000, 3000, files=500, ffree=400),
                   _target(1, 4000, 0, 4000, files=500, ffree=500)]}
    assert df_text(df) == (
        "UUID                   1K-blocks        Used   Available Use% Mounted on\n"
        "lustrefuse-MDT0000_UUID        1000         100         900  10% /mnt/x[MDT:0]\n"
        "lustrefuse-OST0000_UUID        4000        1000        3000  25% /mnt/x[OST:0]\n"
        "lustrefuse-OST0001_UUID        4000           0        4000   0% /mnt/x[OST:1]\n"
        "\n"
        "filesystem_summary:         8000        1000        7000  13% /mnt/x\n"
        "\n")


def test_df_human_readable_matches_real_row():
    # "lustrefs-MDT0000_UUID        5.6G       45.8M        5.0G   1% /lustrefs[MDT:0]"
    mdt = {"index": 0, "blocks": 6012954214, "bfree": 6012954214 - 48024371,
           "bavail": 5368709120, "files": 10, "ffree": 5}
    text = df_text({"fsname": "lustrefs", "mdts": [mdt], "osts": []}, "/lustrefs", cooked=True)
    lines = text.split("\n")
    assert lines[0] == "UUID                       bytes        Used   Available Use% Mounted on"
    assert lines[1] == (
        "lustrefs-MDT0000_UUID        5.6G       45.8M        5.0G   1% /lustrefs[MDT:0]")
    assert lines[3] == "filesystem_summary:         5.6G       45.8M        5.0G   1% /lustrefs"


def test_df_si_units_and_small_values():
    mdt = {"index": 0, "blocks": 5_000_000_000, "bfree": 3_500_000_000,
           "bavail": 512, "files": 10, "ffree": 5}
    line = df_text({"fsname": "fs", "mdts": [mdt], "osts": []}, "/m",
                   cooked=True, decimal=True).split("\n")[1]
    assert line == "fs-MDT0000_UUID             5.0G        1.5G         512 100% /m[MDT:0]"
    # like lfs.c, a value of exactly one unit does not roll over to the next
    mdt["bfree"] = 4_000_000_000
    line = df_text({"fsname": "fs", "mdts": [mdt], "osts": []}, "/m",
                   cooked=True, decimal=True).split("\n")[1]
    assert "     1000.0M " in line


def test_df_inodes_summary_limited_by_ost_free_objects():
    df = {"fsname": "fs", "mdts": [_target(0, 100, 0, 100, files=1000, ffree=900)],
          "osts": [_target(0, 100, 0, 100, files=300, ffree=50)]}
    lines = df_text(df, "/m", inodes=True).split("\n")
    assert lines[0] == "UUID                      Inodes       IUsed       IFree IUse% Mounted on"
    assert lines[1] == "fs-MDT0000_UUID             1000         100         900  10% /m[MDT:0]"
    assert lines[2] == "fs-OST0000_UUID              300         250          50  84% /m[OST:0]"
    # summary inodes: MDT used 100 + OST free 50
    assert lines[4] == "filesystem_summary:          150         100          50  67% /m"


def test_df_use_percent_rounds_up():
    def pct(used, avail):
        return df_text({"fsname": "f", "mdts": [_target(0, used + avail, used, avail)],
                        "osts": []}, "/m").split("\n")[1][-14:-10]
    assert pct(1, 199) == "  1%"
    assert pct(50, 50) == " 50%"
    assert pct(0, 100) == "  0%"
    assert pct(2, 1) == " 67%"
