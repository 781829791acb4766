using System.IO.Compression;
using System.Reflection.Metadata;
using System.Xml.Linq;

namespace Vmm.Package.Tests;

/// <summary>
/// The Vmm package as a user installs it. `dotnet pack Vmm.Core` (of the build under test: --no-build,
/// same configuration) gives Vmm.X.nupkg and .snupkg; the tests check what is inside, then a throwaway
/// console app in a temp folder installs the package from that local folder and runs the README's
/// "Using it from a host application" sample, pasted as its Program.cs; it must exit 0.
/// The app's nuget.config puts the local folder first and maps the id Vmm to it alone (so a package of
/// the same name on a public feed can never be picked), the machine's own feeds for anything else, and
/// gives the app a global packages folder of its own in the temp folder: the package is extracted
/// there, never into the machine's (which every run would have to clean, since each packs the same
/// version anew). The app needs no other package (the SDK holds the reference and apphost packs), so
/// nothing is downloaded and the test runs offline.
/// </summary>
[TestFixture]
[Category("Package")]
[NonParallelizable]
public sealed class PackageTests
{
#if DEBUG
    private const string Configuration = "Debug";
#else
    private const string Configuration = "Release";
#endif
    private static readonly TimeSpan Deadline = TimeSpan.FromMinutes(4);

    private static readonly string[] ExpectedEntries =
    [
        "lib/net10.0/Vmm.Core.dll", "lib/net10.0/Vmm.Core.xml",
        "lib/net10.0/Vmm.Native.dll", "lib/net10.0/Vmm.Native.xml",
        "README.md", "LICENSE",
    ];

    private static readonly string[] SymbolAssemblies = ["Vmm.Core", "Vmm.Native"];

    private string _work = null!;
    private string _feed = null!;
    private string _nupkg = null!;
    private string _version = null!;

    [OneTimeSetUp]
    public void Pack()
    {
        _work = Directory.CreateTempSubdirectory("vmm-package-").FullName;
        _feed = Path.Combine(_work, "feed");
        DotnetResult pack = DotnetProcess.Run(Readme.RepositoryRoot, Deadline,
            "pack", Path.Combine(Readme.RepositoryRoot, "Vmm.Core", "Vmm.Core.csproj"), "-c", Configuration, "--no-build", "-o", _feed, "-nodeReuse:false");
        Assert.That(pack.ExitCode, Is.EqualTo(0), pack.ToString());
        _nupkg = Directory.GetFiles(_feed, "Vmm.*.nupkg").Single(p => !p.EndsWith(".snupkg", StringComparison.Ordinal));
        _version = Path.GetFileNameWithoutExtension(_nupkg)["Vmm.".Length..];
    }

    [OneTimeTearDown]
    public void CleanUp()
    {
        if (_work is not null)
            Directory.Delete(_work, recursive: true);
    }

    [Test]
    public void The_package_holds_both_assemblies_their_docs_the_readme_and_the_license()
    {
        using ZipArchive package = ZipFile.OpenRead(_nupkg);
        string[] entries = [.. package.Entries.Select(e => e.FullName)];

        Assert.That(entries, Is.SupersetOf(ExpectedEntries), "the native part (Vmm.Native) travels inside, with its docs");
        Assert.That(entries.Where(e => e.EndsWith(".pdb", StringComparison.Ordinal)), Is.Empty, "pdbs go to the symbols package");
    }

    [Test]
    public void The_package_has_real_metadata_and_no_dependency_on_an_unpublished_package()
    {
        using ZipArchive package = ZipFile.OpenRead(_nupkg);
        XElement metadata = Nuspec(package).Root!.Elements().Single(e => e.Name.LocalName == "metadata");
        string? Field(string name) => metadata.Elements().SingleOrDefault(e => e.Name.LocalName == name)?.Value;
        XElement? Element(string name) => metadata.Elements().SingleOrDefault(e => e.Name.LocalName == name);

        Assert.Multiple(() =>
        {
            Assert.That(Field("id"), Is.EqualTo("Vmm"));
            Assert.That(Field("version"), Does.Match(@"^\d+\.\d+\.\d+"));
            Assert.That(Field("authors"), Is.Not.Empty);
            Assert.That(Field("description"), Does.Contain("virtual memory manager"));
            Assert.That(Field("license"), Is.EqualTo("MIT"));
            Assert.That(Element("license")?.Attribute("type")?.Value, Is.EqualTo("expression"));
            Assert.That(Field("readme"), Is.EqualTo("README.md"));
            Assert.That(Field("tags"), Does.Contain("ksm").And.Contain("virtual-memory"));
            Assert.That(Element("repository")?.Attribute("type")?.Value, Is.EqualTo("git"));
            Assert.That(metadata.Descendants().Where(e => e.Name.LocalName == "dependency").Select(e => e.Attribute("id")?.Value),
                Has.None.StartsWith("Vmm"), "Vmm.Native is inside the package, not a dependency");
        });
    }

    [Test]
    public void The_symbols_package_holds_both_pdbs_with_their_sources_embedded()
    {
        string snupkg = Path.ChangeExtension(_nupkg, ".snupkg");
        Assert.That(File.Exists(snupkg), Is.True, "IncludeSymbols with SymbolPackageFormat snupkg");
        using ZipArchive symbols = ZipFile.OpenRead(snupkg);

        foreach (string assembly in SymbolAssemblies)
        {
            ZipArchiveEntry? pdb = symbols.GetEntry($"lib/net10.0/{assembly}.pdb");
            Assert.That(pdb, Is.Not.Null, $"{assembly}.pdb in the symbols package");
            using var copy = new MemoryStream();
            using (Stream stream = pdb!.Open())
                stream.CopyTo(copy);
            copy.Position = 0;
            using MetadataReaderProvider provider = MetadataReaderProvider.FromPortablePdbStream(copy);
            MetadataReader reader = provider.GetMetadataReader();
            var embeddedSource = new Guid("0E8A571B-6926-466E-B4AD-8AB04611F5FE");
            int documents = reader.Documents.Count;
            int embedded = reader.CustomDebugInformation
                .Select(reader.GetCustomDebugInformation)
                .Count(info => info.Parent.Kind == HandleKind.Document && reader.GetGuid(info.Kind) == embeddedSource);
            Assert.That(embedded, Is.GreaterThan(0).And.EqualTo(documents), $"{assembly}.pdb embeds every source (a debugger steps in with no server)");
        }
    }

    [Test]
    public void A_console_app_installs_the_package_from_a_local_folder_and_runs_the_readme_host_sample()
    {
        string app = Path.Combine(_work, "app");
        Directory.CreateDirectory(app);
        List<string> feeds = MachineFeeds(app);
        File.WriteAllText(Path.Combine(app, "nuget.config"), NugetConfig(_feed, feeds, Path.Combine(_work, "packages")));
        File.WriteAllText(Path.Combine(app, "app.csproj"), $"""
            <Project Sdk="Microsoft.NET.Sdk">
              <PropertyGroup>
                <OutputType>Exe</OutputType>
                <TargetFramework>net10.0</TargetFramework>
                <ImplicitUsings>enable</ImplicitUsings>
                <Nullable>enable</Nullable>
              </PropertyGroup>
              <ItemGroup>
                <PackageReference Include="Vmm" Version="{_version}" />
              </ItemGroup>
            </Project>
            """);
        File.WriteAllText(Path.Combine(app, "Program.cs"), Readme.Sample("Using it from a host application").Code);

        DotnetResult restore = DotnetProcess.Run(app, Deadline, "restore", "-nodeReuse:false");
        Assert.That(restore.ExitCode, Is.EqualTo(0), restore.ToString());
        Assert.That(Directory.Exists(InstalledCopy()), Is.True, $"restore extracted Vmm {_version} from the local folder");

        DotnetResult build = DotnetProcess.Run(app, Deadline, "build", "-c", "Release", "--no-restore", "-nodeReuse:false", "-p:UseSharedCompilation=false");
        Assert.That(build.ExitCode, Is.EqualTo(0), build.ToString());
        string output = Path.Combine(app, "bin", "Release", "net10.0");
        Assert.That(File.Exists(Path.Combine(output, "Vmm.Native.dll")), Is.True, "the native part is installed with the package");

        DotnetResult run = DotnetProcess.Run(app, Deadline, Path.Combine(output, "app.dll"));
        Assert.That(run.ExitCode, Is.EqualTo(0), run.ToString());
    }

    // ---- helpers --------------------------------------------------------------------------------------

    private static XDocument Nuspec(ZipArchive package)
    {
        using Stream stream = package.Entries.Single(e => e.FullName == "Vmm.nuspec").Open();
        return XDocument.Load(stream);
    }

    private string InstalledCopy() => Path.Combine(_work, "packages", "vmm", _version.ToLowerInvariant());

    /// <summary>The enabled package sources of the machine's own NuGet configuration, as seen from <paramref name="directory"/>.</summary>
    private static List<string> MachineFeeds(string directory)
    {
        DotnetResult list = DotnetProcess.Run(directory, Deadline, "nuget", "list", "source", "--format", "short");
        Assert.That(list.ExitCode, Is.EqualTo(0), list.ToString());
        return [.. list.Output.Split('\n').Select(l => l.Trim()).Where(l => l.StartsWith("E ", StringComparison.Ordinal)).Select(l => l[2..].Trim())];
    }

    /// <summary>The local folder for Vmm and only for Vmm; the machine's feeds for everything else; a private global packages folder.</summary>
    private static string NugetConfig(string localFeed, List<string> feeds, string globalPackages)
    {
        var config = new XElement("config", new XElement("add", new XAttribute("key", "globalPackagesFolder"), new XAttribute("value", globalPackages)));
        var sources = new XElement("packageSources", new XElement("clear"), new XElement("add", new XAttribute("key", "vmm-local"), new XAttribute("value", localFeed)));
        var mapping = new XElement("packageSourceMapping",
            new XElement("packageSource", new XAttribute("key", "vmm-local"), new XElement("package", new XAttribute("pattern", "Vmm"))));
        for (int i = 0; i < feeds.Count; i++)
        {
            sources.Add(new XElement("add", new XAttribute("key", $"feed{i}"), new XAttribute("value", feeds[i])));
            mapping.Add(new XElement("packageSource", new XAttribute("key", $"feed{i}"), new XElement("package", new XAttribute("pattern", "*"))));
        }
        return new XDocument(new XElement("configuration", config, sources, mapping)).ToString();
    }
}
