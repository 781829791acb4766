using System.Reflection;
using System.Xml.Linq;

namespace Vmm.Tests.Api;

/// <summary>
/// The public surface is deliberate (issue 9, part 6; issue 10, part 1): kernel-level machinery is not
/// the host API, so a host cannot free a frame that processes map or write through a raw frame span,
/// because nothing public leads there. Every public type lives in namespace Vmm, says whether it is
/// thread-safe, and is listed in the PublicAPI files that the build checks (PublicApiAnalyzers).
/// </summary>
public sealed class PublicSurfaceTests
{
    private static readonly Assembly Core = typeof(Machine).Assembly;
    private static readonly Assembly Native = typeof(Topology).Assembly;
    private static readonly Type[] Exported = [.. Core.GetExportedTypes().Concat(Native.GetExportedTypes())];
    private static readonly string[] ApiFiles = ["PublicAPI.Shipped.txt", "PublicAPI.Unshipped.txt"];

    [Test]
    public void The_allocator_the_arena_the_page_kernels_and_the_frame_descriptors_are_not_public()
    {
        string[] machinery =
        [
            "PageAllocator", "Zone", "PerCpuPages", "MemMap", "PageDescriptor", "PageLock", "Arena", "ArenaHandle", "ArenaException",
            "AddressSpace", "MappingRegistry", "RmapWalker", "PageOps", "HostMemory", "AllocFlags", "FaultSite", "FaultInjector",
        ];
        string[] publicNames = [.. Exported.Select(t => t.Name)];
        Assert.That(publicNames, Has.None.AnyOf(machinery), "machinery stays internal; hosts use Machine's calls");
    }

    [Test]
    public void Machine_hands_out_no_allocator_arena_or_raw_frame_span()
    {
        string[] members = [.. typeof(Machine).GetMembers(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static).Select(m => m.Name)];
        Assert.That(members, Has.None.AnyOf("Allocator", "Arena", "MemMap", "GetFrameSpan", "PageLock"));
        Assert.That(members, Does.Contain(nameof(Machine.ReleaseFreeMemory)).And.Contain(nameof(Machine.GetMemoryBlock)).And.Contain(nameof(Machine.GetStats)),
            "what a host legitimately needed from the allocator has a call of its own");
    }

    [Test]
    public void Topology_shows_the_machine_shape_but_not_the_pfn_arithmetic()
    {
        string[] members = [.. typeof(Topology).GetMembers(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static).Select(m => m.Name)];
        Assert.That(members, Has.None.AnyOf("NodeOf", "BlockOf", "NodeOfBlock", "FirstPfnOfBlock", "FirstPfnOfNode", "OffsetOf", "PfnOfOffset", "IsValidPfn"),
            "pfns name frames of the arena: machinery");
        Assert.That(typeof(Topology).GetConstructors(), Is.Empty, "a host gets its topology from Machine.Topology");
        Assert.That(members, Does.Contain(nameof(Topology.NodeCount)).And.Contain(nameof(Topology.BlockCount)).And.Contain(nameof(Topology.PageSize)));
    }

    [Test]
    public void No_public_member_returns_machinery_or_takes_a_raw_pointer()
    {
        var offenders = new List<string>();
        foreach (Type type in Exported)
        {
            foreach (MethodInfo method in type.GetMethods(BindingFlags.Public | BindingFlags.Instance | BindingFlags.Static | BindingFlags.DeclaredOnly))
            {
                if (method.ReturnType.IsPointer || method.GetParameters().Any(p => p.ParameterType.IsPointer))
                    offenders.Add($"{type.Name}.{method.Name}");
            }
        }
        Assert.That(offenders, Is.Empty, "a pointer into the arena would outlive every guard");
    }

    [Test]
    public void Every_public_type_lives_in_namespace_Vmm_so_a_host_needs_one_using()
    {
        string[] elsewhere = [.. Exported.Where(t => t.Namespace != "Vmm").Select(t => t.FullName!)];
        Assert.That(elsewhere, Is.Empty, "machinery namespaces (Vmm.Mm, Vmm.Memory, Vmm.Native, ...) hold only internal types");
    }

    [Test]
    public void Every_public_type_but_an_enum_states_its_thread_safety_in_its_docs()
    {
        var silent = new List<string>();
        foreach (Type type in Exported.Where(t => !t.IsEnum))
        {
            string docs = TypeDocs(type);
            if (!docs.Contains("thread-safe", StringComparison.OrdinalIgnoreCase) && !docs.Contains("immutable", StringComparison.OrdinalIgnoreCase))
                silent.Add(type.FullName!);
        }
        Assert.That(silent, Is.Empty,
            "each public type says \"This type is thread-safe: ...\", \"Instances are immutable ...\" or \"Not thread-safe ...\" (enums are values and say nothing)");
    }

    [Test]
    public void The_public_api_files_list_exactly_the_exported_types_with_their_nullability()
    {
        string root = RepositoryRoot();
        foreach ((Assembly assembly, string project) in new[] { (Core, "Vmm.Core"), (Native, "Vmm.Native") })
        {
            string[] lines = [.. ApiFiles.SelectMany(file => File.ReadAllLines(Path.Combine(root, project, file)))];
            Assert.That(File.ReadLines(Path.Combine(root, project, "PublicAPI.Unshipped.txt")).First(), Is.EqualTo("#nullable enable"),
                $"{project}: nullable annotations are part of the recorded surface");
            // A type's own line has no "->" (members do: "Vmm.Machine.Dispose() -> void").
            string[] listedTypes = [.. lines.Where(l => l.Length > 0 && !l.StartsWith('#') && !l.Contains("->", StringComparison.Ordinal)).Order(StringComparer.Ordinal)];
            string[] exportedTypes = [.. assembly.GetExportedTypes().Select(t => t.FullName!).Order(StringComparer.Ordinal)];
            Assert.That(listedTypes, Is.EqualTo(exportedTypes), $"{project}: the PublicAPI files and the assembly agree (the analyzer checks every member at build time)");
        }
    }

    /// <summary>The summary and remarks of a type in its assembly's XML documentation file.</summary>
    private static string TypeDocs(Type type)
    {
        XDocument xml = Docs(type.Assembly);
        XElement? member = xml.Descendants("member").FirstOrDefault(m => (string?)m.Attribute("name") == "T:" + type.FullName);
        Assert.That(member, Is.Not.Null, $"{type.FullName} has XML docs");
        return string.Concat(member!.Elements("summary").Concat(member.Elements("remarks")).Select(e => e.Value));
    }

    private static readonly Dictionary<Assembly, XDocument> DocFiles = [];

    private static XDocument Docs(Assembly assembly)
    {
        lock (DocFiles)
        {
            if (!DocFiles.TryGetValue(assembly, out XDocument? xml))
                DocFiles[assembly] = xml = XDocument.Load(Path.ChangeExtension(assembly.Location, ".xml"));
            return xml;
        }
    }

    /// <summary>The nearest folder above the test binaries that holds Vmm.sln.</summary>
    private static string RepositoryRoot()
    {
        for (string? dir = AppContext.BaseDirectory; dir is not null; dir = Path.GetDirectoryName(dir))
        {
            if (File.Exists(Path.Combine(dir, "Vmm.sln")))
                return dir;
        }
        throw new InvalidOperationException($"no Vmm.sln above {AppContext.BaseDirectory}");
    }
}
