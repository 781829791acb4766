namespace Vmm.Tests.Ksm;

/// <summary>
/// Knobs and counters by their sysfs / procfs names, with Linux's errors: a missing file is ENOENT, a
/// read-only file written is EACCES (kernfs refuses to open a file without a store method for writing,
/// even for root), a null name is ArgumentNullException.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Ksm")]
public sealed class KsmFileNameTests
{
    [Test]
    public void An_unknown_name_is_ENOENT_for_write_and_TryRead_and_an_ArgumentException_naming_it_for_Read()
    {
        using var machine = TestMachines.Create();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("no_such_file", "1"), Is.EqualTo(Errno.ENOENT));
        Assert.That(ksm.TryRead("no_such_file", out string value), Is.EqualTo(Errno.ENOENT));
        Assert.That(value, Is.Empty);
        var e = Assert.Throws<ArgumentException>(() => ksm.Read("no_such_file"));
        Assert.That(e!.ParamName, Is.EqualTo("knob"));
        Assert.Throws<ArgumentNullException>(() => ksm.Write(null!, "1"));
        Assert.Throws<ArgumentNullException>(() => ksm.Write("run", null!));
        Assert.Throws<ArgumentNullException>(() => ksm.Read(null!));
        Assert.Throws<ArgumentNullException>(() => ksm.TryRead(null!, out _));
    }

    [Test]
    public void Counters_read_by_name_match_the_record_and_refuse_writes_with_EACCES()
    {
        using var machine = TestMachines.Create();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(8 * 4096);
        for (int i = 0; i < 8; i++)
            p.Write<long>(va + (ulong)i * 4096, 42);
        Assert.That(p.Madvise(va, 8 * 4096, Advice.Mergeable), Is.EqualTo(Errno.None));
        ksm.RunFullScans(2);
        KsmStats stats = ksm.GetStats();
        Assert.That(stats.PagesSharing, Is.GreaterThan(0), "something merged, so the counters are not all zero");
        var expected = new Dictionary<string, long>
        {
            ["pages_shared"] = stats.PagesShared, ["pages_sharing"] = stats.PagesSharing, ["pages_unshared"] = stats.PagesUnshared,
            ["pages_volatile"] = stats.PagesVolatile, ["pages_scanned"] = stats.PagesScanned, ["pages_skipped"] = stats.PagesSkipped,
            ["full_scans"] = stats.FullScans, ["stable_node_chains"] = stats.StableNodeChains, ["stable_node_dups"] = stats.StableNodeDups,
            ["ksm_zero_pages"] = stats.KsmZeroPages, ["general_profit"] = stats.GeneralProfit,
        };
        Assert.That(Vmm.Ksm.CounterNames, Is.EquivalentTo(expected.Keys));
        foreach ((string name, long number) in expected)
        {
            Assert.That(ksm.TryRead(name, out string text), Is.EqualTo(Errno.None), name);
            Assert.That(text, Is.EqualTo(number.ToString(System.Globalization.CultureInfo.InvariantCulture)), name);
            Assert.That(ksm.Read(name), Is.EqualTo(text), name);
            Assert.That(ksm.Write(name, "0"), Is.EqualTo(Errno.EACCES), $"{name} is read-only");
        }
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(stats.PagesSharing), "the refused writes changed nothing");
        foreach (string knob in Vmm.Ksm.KnobNames)
            Assert.That(ksm.TryRead(knob, out _), Is.EqualTo(Errno.None), knob);
        Assert.That(p.ReadKsmStat("ksm_merging_pages", out long merging), Is.EqualTo(Errno.None));
        Assert.That(merging, Is.EqualTo(p.GetKsmStats().MergingPages));
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void Vmstat_counters_read_by_name_and_an_unknown_name_is_ENOENT()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096);
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Write<byte>(va, 1);
        VmStats stats = machine.GetVmStats();
        Assert.That(machine.ReadVmStat("nr_page_table_pages", out long tables), Is.EqualTo(Errno.None));
        Assert.That(tables, Is.EqualTo(stats.PageTablePages).And.GreaterThan(0));
        Assert.That(machine.ReadVmStat("cow_ksm", out long cowKsm), Is.EqualTo(Errno.None));
        Assert.That(cowKsm, Is.EqualTo(stats.CowKsm));
        Assert.That(machine.ReadVmStat("pgmigrate_success", out _), Is.EqualTo(Errno.None));
        Assert.That(machine.ReadVmStat("nr_free_pages", out long free), Is.EqualTo(Errno.None));
        Assert.That(free, Is.GreaterThan(0));
        foreach (string name in Machine.VmStatNames)
            Assert.That(machine.ReadVmStat(name, out _), Is.EqualTo(Errno.None), name);
        Assert.That(machine.ReadVmStat("no_such_counter", out long none), Is.EqualTo(Errno.ENOENT));
        Assert.That(none, Is.Zero);
        Assert.Throws<ArgumentNullException>(() => machine.ReadVmStat(null!, out _));
    }
}
